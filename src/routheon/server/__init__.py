"""routheon-server: the HTTP companion of Traefik (aggregated models, host stats, error bodies)."""
