"""The Lightning side of a run: the LightningModule around the model core, its callbacks, the reliability
policies and the feature cache's writer."""
