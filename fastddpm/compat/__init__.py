"""Interoperability with other libraries (diffusers); each submodule imports its library lazily."""
