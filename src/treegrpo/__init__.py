"""treegrpo: tree-structured GRPO for online RL post-training of diffusion and flow image models."""

__version__ = "0.1.0"


def load_policy(source="base", family=None, **options):
    """A `Policy` for a diffusers pipeline, a local folder, a cached model id or "base"; see
    `treegrpo.policies.loading.load_policy`."""
    from treegrpo.policies.loading import load_policy as _load

    return _load(source, family, **options)
