"""Where adapters live and how they are chosen and served: the local store, PEFT export, the router, the engine
and its decode loop, the OpenAI-compatible server, the CLI."""
