"""Where adapters live and how they are chosen: the local store, PEFT export, the CLI."""
