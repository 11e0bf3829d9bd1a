"""Federated training of the collection's bundles on NVFlare, around MONAI's ``MonaiAlgo``.

``job`` writes an NVFlare job folder for a bundle; ``executor`` runs the bundle's train.json on a
site; ``persistor`` keeps the global model as the bundle's ``models/model.pt``; ``scores`` writes the
table of every site's and the global model's validation scores.
"""
