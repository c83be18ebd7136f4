"""The models: a retrieval contract (`retrieval`), shared layers and losses, ProtoPRVR, MS-SL and GMMFormer,
each with a typed config (`config`), built by `factory` from the declarative presets in models/."""
