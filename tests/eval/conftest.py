import pytest


def tiny_shapeedit_pipeline(size: int = 32, seed: int = 0):
    """A random-weight LIVEditor pipeline on pixels (space-to-depth codec) for ShapeEdit clips."""
    from liveditor.models.tiny_codec import SpaceToDepthVideoCodec
    from liveditor.pipelines.pipeline_liveditor import LIVEditorPipeline
    from tiny_models import tiny_components

    codec = SpaceToDepthVideoCodec(scale_factor_spatial=8)
    channels = codec.config.z_dim
    components = tiny_components(seed=seed, resolution_buckets=((size, size),), in_channels=channels, out_channels=channels)
    components["vae"] = codec
    pipe = LIVEditorPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def shapeedit_pipeline():
    return tiny_shapeedit_pipeline()


@pytest.fixture(scope="module")
def shapeedit_model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny_shapeedit_pipeline().save_pretrained(folder)
    return folder
