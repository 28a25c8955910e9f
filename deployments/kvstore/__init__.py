"""The shared prefix-cache tier on Redis: value format (codec), connection (store), the Router-side
lookup and write-back (tier), and its set-up (setup)."""
