"""tokenmill.workers"""
