"""The peers jobfeed is measured against, driven like its workloads: NATS JetStream, Redis."""
