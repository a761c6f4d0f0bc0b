"""Raw images -> WebDataset shard sets (listing, image checks, shard writer, build plan)."""
from distssl.shards.build import BuildOptions, is_complete, make_shards
from distssl.shards.images import ImageOptions

__all__ = ["BuildOptions", "ImageOptions", "is_complete", "make_shards"]
