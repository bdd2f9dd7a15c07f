"""What the tests and the load tests share: free loopback ports, the one client-side SSE parser, throwaway servers
(PostgreSQL, Prometheus, an OTLP receiver) and the test doubles. Product code never imports it.
"""
