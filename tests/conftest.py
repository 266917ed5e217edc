import sys
from pathlib import Path

# test helpers (peft_reference, ...) import as top-level modules from any test directory
sys.path.insert(0, str(Path(__file__).parent))
