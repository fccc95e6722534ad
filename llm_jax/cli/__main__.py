import sys

from llm_jax.cli import main

sys.exit(main())
