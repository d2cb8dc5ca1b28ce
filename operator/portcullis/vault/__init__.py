"""Per-user credentials: AES-256-GCM sealing and the storage backends behind one interface."""
