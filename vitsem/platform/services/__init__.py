"""Sharded, idempotent units of work over the stores: what the Prefect tasks call.

Each function takes plain values (paths, digests, settings) and can be called and tested
without Prefect. Results are content-addressed in the artifact store and indexed in SQL, so a
rerun (or a rerun after a crash) finds finished work instead of repeating it.

- :mod:`.context`: the stores of a settings object, loaded models, shard reports;
- :mod:`.keypoints`: the keypoint store (one set per image, view and SIFT settings);
- :mod:`.analysis`: interrelation statistics per shard and their merge;
- :mod:`.audit`: the spurious-correlation audit of a labelled data set;
- :mod:`.pretrain`: resumable guided pre-training.
"""
