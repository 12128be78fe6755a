"""Guards that every other part leans on: keys encrypted at rest, secrets kept out of logs,
hostile input refused at the edge, rate limits."""
