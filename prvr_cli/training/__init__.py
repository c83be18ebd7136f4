"""Training: data in one in-memory form (`datasets`) read from feature releases (`feature_layouts`) or an index
with captions (`own_videos`), the loop (`loop`) and the PRVR evaluation protocol (`evaluate`)."""
