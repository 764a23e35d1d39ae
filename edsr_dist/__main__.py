import sys

from edsr_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
