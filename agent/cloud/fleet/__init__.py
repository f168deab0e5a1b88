"""The fleet side of deployments, over the broker alone: orders out, the devices' reports in.

client.py     the broker connection (one short-lived paho client, every failure one line)
inventory.py  what the retained topics say: devices, their groups, models and health; the orders
watch.py      following one order: each device's progress from its events and health
deploy.py     `fleet deploy`: write the signed, retained order, after a canary run when asked
status.py     `fleet status`: the inventory as JSON and as a table

Only the standard library, paho-mqtt and the signing module are needed: no onnx (the cloud extra).
"""
