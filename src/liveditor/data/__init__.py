"""Data: the ShapeEdit procedural editing domain (`shapes`; batched GPU rendering in
`shapes_batch`), training shards (`shards`) and video files (`video_io`). Submodules are imported
on use so that `shapes` needs only numpy."""
