"""tokenmill.producers"""
