"""Model classes that run inside vLLM's engine (registered in model_registry/)."""
