"""Lightning callbacks that measure sensitivity and generalization while a model trains."""
