"""A fake torch_npu for CPU-only tests: the `npu` device and the `hccl` backend, emulated on the CPU.

Never installed with the package: tests that want it put tests/fake_npu on PYTHONPATH. It enforces what the
real torch_npu and HCCL enforce (read from Ascend/pytorch at 9e73e70), so code that breaks those rules fails here:

* NPU tensors are contiguous only: `empty` refuses other memory formats (torch_npu
  csrc/aten/common/TensorFactories.cpp:192-196) and `.to()` refuses any but contiguous/preserve
  (csrc/aten/common/ToKernelNpu.cpp:69-73).
* HCCL all-reduce takes int8/16/32/64, fp16, fp32, bf16 only (csrc/distributed/ProcessGroupHCCL.cpp:170-185),
  bool and uint8 by casting them to int32 and back (allreduce, L4793-4796 and L4819-4823), and no BAND/BOR/BXOR
  (ProcessGroupHCCL.cpp:94-97, 159-162).
* ASCEND_RT_VISIBLE_DEVICES is parsed as torch_npu parses it (npu/__init__.py _parse_visible_devices,
  _device_count_ascend_hal): no device for ids not in ascending order; `set_device` takes a logical index below
  the number of visible devices.
* Two ranks of one host on one card stop the process group (HCCL gives each rank its own device).
* Autoload: tests/fake_npu holds a torch_npu dist-info with the `torch.backends` entry point torch_npu's setup.py
  registers, so `import torch` imports this module (torch/__init__.py _import_device_backends); as torch_npu does
  (torch_npu/__init__.py:6-10) it sets TORCH_DEVICE_BACKEND_AUTOLOAD=0 around its own `import torch`.
  FAKE_NPU_BROKEN_CANN=1 makes the import fail as it does without CANN's libraries (OSError).
* On 910A-class chips (FAKE_NPU_SOC, default Ascend910A) fp16 overflow saturates to +-65504 and raises a global
  float-status flag; `_amp_foreach_non_finite_check_and_unscale_` reports that flag and clears it when set, as
  op-plugin's NPU kernel does; otherwise only `torch_npu.npu.utils.clear_npu_overflow_flag()` clears it.
* RANK_TABLE_FILE: a rank whose entry the table does not give (no readable regular file, no version 1.0 table,
  or its rank_id on another card) falls back to root-info, as ProcessGroupHCCL.cpp createHCCLCommEx (L2756-2809)
  and getHCCLComm (L3011-3013) do; when only some ranks fall back, the real job hangs: here that is an error.

Records (torch_npu._record): FAKE_NPU_RECORD=<file> gets a JSON line for the optimizer built and each
set_compile_mode; `_record.counters` counts blocking device reads and pageable non_blocking copies to the device.

Test knobs (environment): FAKE_NPU_COUNT physical cards (default 8); FAKE_NPU_HOST the host name HCCL sees (for
processes that stand for separate pods); FAKE_NPU_SOC; FAKE_NPU_OVERFLOW_STEPS
"rank:n,..." raises the flag during the n-th overflow check (the n-th fp16 step) of that rank;
FAKE_NPU_INFERENCE_OVERFLOW=1 makes every fp16 op under inference mode (validation) overflow.
"""

import json
import os
import socket

if os.environ.get("FAKE_NPU_BROKEN_CANN") == "1":
    raise OSError("libascendcl.so: cannot open shared object file: No such file or directory")

_ORG_AUTOLOAD = os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD", "1")
os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"  # torch_npu/__init__.py:6-10: no circular autoload

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.utils.backend_registration as _registration  # noqa: E402
from torch.futures import Future  # noqa: E402
from torch.utils._pytree import tree_leaves, tree_map  # noqa: E402

from torch_npu import _record, npu, optim  # noqa: E402,F401  (torch_npu.optim is part of the module)
from torch_npu import distributed as _distributed  # noqa: E402
from torch_npu.npu import utils as _utils  # noqa: E402

FP16_MAX = 65504.0


class NPUTensor(torch.Tensor):
    """An `npu` tensor whose data is a CPU tensor (`elem`)."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor, index: int):
        # Every tensor lives on npu:0: autograd gives a Python-registered device one queue (index 0) only, and each
        # fake process is one card anyway. `set_device` still checks the logical index the code asks for.
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            device=torch.device("npu", 0), requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def tolist(self):
        _record.counters["device_reads"] += 1
        return self.elem.tolist()

    def __repr__(self):
        return f"NPUTensor(npu:{self.device.index}, {self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _index_of(args, kwargs) -> int:
    for leaf in tree_leaves((args, kwargs)):
        if isinstance(leaf, NPUTensor):
            return leaf.device.index
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "npu":
        return torch.device(device).index if torch.device(device).index is not None else npu.current_device()
    return npu.current_device()


def _check_memory_format(func, kwargs) -> None:
    fmt = kwargs.get("memory_format")
    if func in (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default):
        if fmt not in (None, torch.contiguous_format, torch.preserve_format):
            raise RuntimeError("Only c10::MemoryFormat::Contiguous is supported for creating a npu tensor")
    if func is torch.ops.aten._to_copy.default:
        if fmt not in (None, torch.contiguous_format, torch.preserve_format):
            raise RuntimeError("Only contiguous_format or preserve_format is supported.")


def _saturate(out):
    """910A saturation mode: fp16 results beyond the range become +-65504 and raise the float-status flag."""
    if _utils.is_support_inf_nan():
        return out
    inference_overflow = os.environ.get("FAKE_NPU_INFERENCE_OVERFLOW") == "1" and torch.is_inference_mode_enabled()
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.dtype == torch.float16 and t.numel():
            bad = ~torch.isfinite(t) | (t.abs() > FP16_MAX)
            if bool(bad.any()) or inference_overflow:
                _utils._raise_flag()
                t.nan_to_num_(nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)
    return out


def _run(func, args, kwargs):
    if func is torch.ops.aten.record_stream.default:
        return None
    index = _index_of(args, kwargs)
    _check_memory_format(func, kwargs)
    if func is torch.ops.aten._amp_foreach_non_finite_check_and_unscale_.default:
        return _non_finite_check_and_unscale(*args)
    _count_host_reads(func, args, kwargs)
    unwrap = lambda t: t.elem if isinstance(t, NPUTensor) else t  # noqa: E731
    kwargs = dict(kwargs)
    device = kwargs.get("device")
    to_npu = device is not None and torch.device(device).type == "npu"
    if to_npu:
        kwargs["device"] = torch.device("cpu")
    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    from_cpu = device is not None and not to_npu  # e.g. .to("cpu")
    if from_cpu:
        return out
    out = _saturate(out)
    return tree_map(lambda t: NPUTensor(t, index) if type(t) is torch.Tensor else t, out)


def _count_host_reads(func, args, kwargs) -> None:
    """A read of an npu tensor by the host that waits for the device: a scalar, or a blocking copy to the CPU."""
    if func is torch.ops.aten._local_scalar_dense.default:
        _record.counters["device_reads"] += 1
    elif func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None \
            and torch.device(kwargs["device"]).type == "cpu" and not kwargs.get("non_blocking", False):
        _record.counters["device_reads"] += 1
    elif func is torch.ops.aten.copy_.default:
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if not isinstance(args[0], NPUTensor) and not non_blocking:
            _record.counters["device_reads"] += 1
        elif isinstance(args[0], NPUTensor) and not isinstance(args[1], NPUTensor) and non_blocking \
                and not _is_pinned(args[1]):
            _record.counters["pageable_async_copies"] += 1


def _pin_memory(self, device=None):
    """Page-locked memory for the npu (torch_npu registers _pin_memory/is_pinned: npu_native_functions.yaml:6,33):
    here a copy the fake remembers as pinned."""
    out = self.clone()
    out._fake_pinned = True
    return out


def _is_pinned(self, device=None):
    return bool(getattr(self, "_fake_pinned", False))


def _non_finite_check_and_unscale(grads, found_inf, inv_scale):
    """op-plugin's acl_op::_amp_foreach_non_finite_check_and_unscale_ (AmpForeachNonFiniteCheckAndUnscaleKernelNpu.cpp):
    in saturation mode the answer is the float-status flag, cleared when it was set; no unscaling after an overflow."""
    _utils._count_check()
    inner = [g.elem for g in grads]
    if _utils.is_support_inf_nan():
        torch._amp_foreach_non_finite_check_and_unscale_(inner, found_inf.elem, inv_scale.elem)
        return None
    if _utils._flag_is_set():
        _utils.clear_npu_overflow_flag()
        found_inf.elem.add_(1)
    else:
        torch._foreach_mul_(inner, inv_scale.elem.reshape(()))
    return None


def _empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    if memory_format not in (None, torch.contiguous_format):
        raise RuntimeError("Only c10::MemoryFormat::Contiguous is supported for creating a npu tensor")
    index = device.index if device is not None and device.index is not None else npu.current_device()
    return NPUTensor(torch.empty(size, dtype=dtype), index)


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
    index = device.index if device is not None and device.index is not None else npu.current_device()
    return NPUTensor(torch.empty_strided(size, stride, dtype=dtype), index)


def _copy_from(src, dst, non_blocking=False):
    """Copies that bypass Python dispatch (torch.tensor(..., device=npu) fills its result this way)."""
    if non_blocking and not isinstance(src, NPUTensor) and not _is_pinned(src):
        _record.counters["pageable_async_copies"] += 1
    dst.elem.copy_(src.elem if isinstance(src, NPUTensor) else src)
    return dst


def _conv2d_autocast(*args, **kwargs):
    """torch_npu registers fp16/bf16 autocast kernels for convolutions; the one EDSR needs, in Python."""
    dtype = torch.get_autocast_dtype("npu")
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    below = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastPrivateUse1)
    with torch._C._ExcludeDispatchKeyGuard(below):
        return torch.ops.aten.conv2d.default(*tree_map(cast, args), **kwargs)


# ---- HCCL, as a process group over Gloo -------------------------------------------------------------------

_ALLREDUCE_DTYPES = {torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32, torch.bfloat16}
_UNSUPPORTED_OPS = {dist.ReduceOp.BAND: "BAND", dist.ReduceOp.BOR: "BOR", dist.ReduceOp.BXOR: "BXOR"}


class _Done(dist._Work):
    def __init__(self, result):
        super().__init__()
        self._future = Future()
        self._future.set_result(result)

    def wait(self, timeout=None):
        return True

    def get_future(self):
        return self._future


def _cpu(tensors):
    for t in tensors:
        if not isinstance(t, NPUTensor):
            raise RuntimeError(f"HCCL: tensors must be on the npu device, got {t.device}")
    return [t.elem for t in tensors]


class FakeHCCL(dist.ProcessGroup):
    def __init__(self, store, rank, size, timeout):
        super().__init__(rank, size)
        self._gloo = dist.ProcessGroupGloo(dist.PrefixStore("fake-hccl", store), rank, size, timeout)
        self._check_cards_and_table(rank, size)

    def _check_cards_and_table(self, rank, size):
        """Every rank's (host, card) and whether RANK_TABLE_FILE gave it its entry, compared across ranks."""
        host = os.environ.get("FAKE_NPU_HOST") or socket.gethostname()  # FAKE_NPU_HOST: pods on one test machine
        mine = f"{host}|{npu._physical(npu.current_device())}|{int(_table_entry_ok(rank))}"
        encoded = torch.tensor(list(mine.encode().ljust(128)), dtype=torch.uint8)
        gathered = [torch.empty_like(encoded) for _ in range(size)]
        self._gloo.allgather([gathered], [encoded]).wait()
        claims = [bytes(t.tolist()).decode().strip().split("|") for t in gathered]
        cards = {}
        for other, (host, card, _) in enumerate(claims):
            if (host, card) in cards:
                raise RuntimeError(f"fake HCCL: ranks {cards[(host, card)]} and {other} are both on device {card} of "
                                   f"{host}; HCCL needs one device per rank")
            cards[(host, card)] = other
        table_ranks = [r for r, (_, _, ok) in enumerate(claims) if ok == "1"]
        if table_ranks and len(table_ranks) != size:
            raise RuntimeError(f"fake HCCL: ranks {table_ranks} build the communicator from RANK_TABLE_FILE, the others "
                               "fall back to root-info: the real HCCL waits here until its timeout")

    def getBackendName(self):
        return "hccl"

    def allreduce(self, tensors, opts=None):
        opts = opts if opts is not None else dist.AllreduceOptions()
        if opts.reduceOp in _UNSUPPORTED_OPS:
            raise RuntimeError(f"Cannot use ReduceOp.{_UNSUPPORTED_OPS[opts.reduceOp]} with HCCL")
        inner = _cpu(tensors)
        # bool and uint8 travel as int32 (ProcessGroupHCCL.cpp:4793-4796), copied back afterwards (L4819-4823).
        cast = [t.to(torch.int32) if t.dtype in (torch.bool, torch.uint8) else t for t in inner]
        for t in cast:
            if t.dtype not in _ALLREDUCE_DTYPES:
                raise RuntimeError(f"HCCL allreduce: Unsupported data type {t.dtype}")
        self._gloo.allreduce(cast, opts).wait()
        for original, reduced in zip(inner, cast):
            if reduced is not original:
                original.copy_(reduced)
        return _Done(tensors)

    def broadcast(self, tensors, opts=None):
        self._gloo.broadcast(_cpu(tensors), opts if opts is not None else dist.BroadcastOptions()).wait()
        return _Done(tensors)

    def allgather(self, output_lists, inputs, opts=None):
        self._gloo.allgather([_cpu(out) for out in output_lists], _cpu(inputs)).wait()
        return _Done(output_lists)

    def barrier(self, opts=None):
        self._gloo.barrier().wait()
        return _Done([])


def _table_entry_ok(rank: int) -> bool:
    """Whether torch_npu + HCCL would build this rank's communicator from RANK_TABLE_FILE
    (ProcessGroupHCCL.cpp:2764-2768 checkFilePathReadable; HCCL refuses a rank_id whose device_id is another card)."""
    path = os.environ.get("RANK_TABLE_FILE")
    if not path or os.path.islink(path) or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    if "server_list" not in table or str(table.get("version")) != "1.0":
        raise RuntimeError(f"fake HCCL: RANK_TABLE_FILE {path} is not a version 1.0 table: ranks matched by pod "
                           "identity would hang")
    ranks = {int(d["rank_id"]): int(d["device_id"]) for s in table["server_list"] for d in s["device"]}
    return ranks.get(rank) == npu._physical(npu.current_device())


def _install() -> None:
    _registration._setup_privateuseone_for_python_backend(rename="npu", backend_module=npu)
    torch.Tensor.pin_memory, torch.Tensor.is_pinned = _pin_memory, _is_pinned
    factories = torch.library.Library("aten", "IMPL")
    factories.impl("empty.memory_format", _empty, "PrivateUse1")
    factories.impl("empty_strided", _empty_strided, "PrivateUse1")
    factories.impl("_copy_from", _copy_from, "PrivateUse1")
    factories.impl("conv2d", _conv2d_autocast, "AutocastPrivateUse1")
    autocast = torch.library.Library("_", "IMPL", "AutocastPrivateUse1")
    autocast.fallback(torch.library.fallthrough_kernel)
    _install.libraries = (factories, autocast)  # keep the registrations alive
    _distributed._install()
    dist.Backend.register_backend("hccl", lambda store, rank, size, timeout: FakeHCCL(store, rank, size, timeout),
                                  devices=["npu"])



def _autoload() -> None:
    """The `torch.backends` entry point: importing this module did the work; sub processes inherit the setting."""
    os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = _ORG_AUTOLOAD


_install()
os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = _ORG_AUTOLOAD
