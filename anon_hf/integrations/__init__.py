"""Optional integrations with the Hugging Face stack. Each submodule imports its dependency only when used."""
