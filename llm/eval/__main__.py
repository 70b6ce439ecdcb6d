"""`python -m llm.eval`: see llm/eval/__init__.py."""
from . import main

main()
