"""A web page over the inference Pipeline: a FastAPI app, a bounded job queue, a plain HTML/JS page."""
