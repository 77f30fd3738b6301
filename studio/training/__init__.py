"""Personalization: LoRA, DreamBooth with prior preservation and Textual Inversion.

`settings.TrainingSettings` is the one shape every way in builds; `trainer.run` trains as a
job (`studio.jobs`), with checkpoints it resumes from; one module per method says what is
trained and how it is saved.
"""
