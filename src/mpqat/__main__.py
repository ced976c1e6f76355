"""``python -m mpqat`` (also what ``torchrun -m mpqat`` runs)."""

from mpqat.cli import main

main()
