"""The training core: from decoded images to a trained model in plain torch. Never imports Ray: one run
works by itself."""
