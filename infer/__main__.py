import sys

from infer.cli import main

if __name__ == "__main__":  # vLLM's engine and workers are new processes that re-import the main module
    sys.exit(main())
