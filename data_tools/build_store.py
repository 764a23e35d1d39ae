"""Build an HDF5 patch store: `python data_tools/build_store.py ARGS` is `edsr-dist build-store ARGS`.

Example (DIV2K with the official bicubic LR, DIV2K validation images stored whole):
  python data_tools/build_store.py --hr-dir DIV2K_train_HR --lr-dir DIV2K_train_LR_bicubic \
      --valid-hr-dir DIV2K_valid_HR --valid-lr-dir DIV2K_valid_LR_bicubic --scales 2,3,4 --out div2k_x234.h5
"""

import os
import sys

if __name__ == "__main__":
    # Run from a source checkout without installing: put the repository root first on the path.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from edsr_dist.cli import main

    sys.exit(main(["build-store", *sys.argv[1:]]))
