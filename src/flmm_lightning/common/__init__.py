"""Small helpers the rooms share: mask arithmetic, frozen parts, atomic files, gathering across ranks and
the feature cache's store."""
