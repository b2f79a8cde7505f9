"""The torch core: ``nn.Module``s and tensor functions, no scikit-learn and nothing above it.

The estimators in ``sk_padim`` compose these modules; ``docs/architecture.md`` maps them.
"""
