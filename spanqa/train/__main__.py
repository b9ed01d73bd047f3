"""`python -m spanqa.train ...`: launcher/train.py for an installed spanqa
(`deepspeed --module spanqa.train ...`, `torchrun -m spanqa.train ...`)."""

from spanqa.train.entry import run_script

if __name__ == "__main__":
    run_script("python -m spanqa.train")
