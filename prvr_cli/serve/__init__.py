"""`prvr serve`: one index kept warm behind a local HTTP API and a page; `client` lets `prvr search` use it."""
