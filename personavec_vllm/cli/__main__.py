import sys

from personavec_vllm.cli import main

sys.exit(main())
