"""A trained testbed for FlashU: a synthetic world whose image quality and answers are scored exactly."""
