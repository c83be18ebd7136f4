"""The index folder: `store` (LanceDB tables, writer lock, versions), `meta` (index.json), `rows` (Arrow rows),
`matrices` (the cached search matrices) and `search` (scoring, ranking, highlights)."""
