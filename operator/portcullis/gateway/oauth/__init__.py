"""Connected accounts: users authorize upstreams with OAuth once; the gateway keeps their tokens fresh."""
