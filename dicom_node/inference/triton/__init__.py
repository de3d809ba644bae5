"""The Triton backend: a client for running servers (:mod:`.client`), the server the node
starts itself from the nvidia-pytriton wheel (:mod:`.server`), the shared-memory transports
(:mod:`.shm`, :mod:`.cuda_shm`, :mod:`.placement`), the rotation over several servers
(:mod:`.rotation`), the model repository written for a bundle (:mod:`.repository`) and the
code those models run (:mod:`.models`)."""
