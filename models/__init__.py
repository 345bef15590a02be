"""Pure tensor models: tensors in, tensors out. Imports nothing from stream/ or transport/."""
