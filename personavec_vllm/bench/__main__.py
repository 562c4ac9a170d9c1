import sys

from personavec_vllm.bench.options import main

sys.exit(main())
