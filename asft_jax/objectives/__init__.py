"""What training optimises: the preference losses (``losses``), the per-token log-probabilities they
read (``logprobs``) and the pure, jittable train step that combines them (``train_step``)."""
