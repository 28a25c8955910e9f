"""The shared prefix cache on Redis: value format (codec), connection (store), the router-service side
lookup and write-back (cache), and its set-up (setup)."""
