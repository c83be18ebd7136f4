"""The query side without torch or LanceDB: CLIP's tokenizer, the exported text tower and query branch in numpy,
and a search over the files a writer publishes (`prvr_cli.pipeline.text_side`)."""
