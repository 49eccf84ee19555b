"""`python -m finetune.tiny write-data FOLDER | build`."""

from . import main

main()
