"""`python -m dvgt.train --config=train/dvgt1/demo.yaml [--debug] [key.path=value ...]` (also under torchrun)."""

from dvgt.cli import main

if __name__ == "__main__":
    main(["train"], prog="python -m dvgt.train")
