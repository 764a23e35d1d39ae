"""Which cores each worker is pinned to: by the card's own number, or not at all when torch_npu binds."""

import pytest

from edsr_dist.launcher.plan import card_core_shares, core_shares, torch_npu_binds


def test_cards_4_to_7_of_an_8_card_server_keep_their_own_blocks():
    cores = list(range(192))
    assert card_core_shares(cores, [4, 5, 6, 7]) == [list(range(24 * k, 24 * (k + 1))) for k in (4, 5, 6, 7)]
    # Whole servers (and renumbered containers, cards 0..n-1) are split as before.
    assert card_core_shares(cores, list(range(8))) == core_shares(cores, 8)
    assert card_core_shares(cores, [0, 1]) == core_shares(cores, 2)


def test_too_few_cores_for_the_card_blocks_falls_back_to_equal_shares():
    assert card_core_shares([0, 1], [4, 5]) == [[0], [1]]


@pytest.mark.parametrize("conf,binds", [(None, False), ("", False), ("0", False), ("mode:0", False), ("1", True),
                                        ("2", True), ("mode:1,npu_affine:1", True), ("2,lazy_bind:0", True),
                                        ("npu_affine:1,mode:2", True), ("npu0:0-3", False)])
def test_cpu_affinity_conf_hands_binding_to_torch_npu(monkeypatch, conf, binds):
    if conf is None:
        monkeypatch.delenv("CPU_AFFINITY_CONF", raising=False)
    else:
        monkeypatch.setenv("CPU_AFFINITY_CONF", conf)
    assert torch_npu_binds() is binds
