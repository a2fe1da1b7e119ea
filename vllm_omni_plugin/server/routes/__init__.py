"""The omni HTTP routes; each builds its request with the one RequestBuilder."""
