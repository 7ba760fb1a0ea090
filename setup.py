from setuptools import find_packages, setup

try:
    with open("README.md", encoding="utf-8") as fh:
        long_description = fh.read()
except FileNotFoundError:
    long_description = ""

test_requires = [
    # guillotina 7.1.5's own test fixtures (guillotina.tests.fixtures) override the
    # `event_loop` fixture, which only pytest-asyncio 0.21.x honours (0.22+ deprecates
    # and 0.23+ ignores it), and pytest-asyncio 0.21 needs pytest < 8. Keep both pins.
    "pytest>=7.4,<8",
    "pytest-asyncio>=0.21.2,<0.22",
    # What guillotina[test] pulls in and guillotina/tests/{fixtures,utils}.py import
    # (pytest_docker_fixtures also reads RABBITMQ / REDIS / POSTGRESQL=host:port).
    "pytest-docker-fixtures==1.4.2",
    "async-asgi-testclient<2",
    "aiohttp>=3,<4",
    "asyncmock",
    "psycopg2-binary",
    "prometheus-client",
    "openapi-spec-validator==0.8.4",
    # browser tests of the dashboard drive the OS Chromium (apt-get install chromium): no browser download
    "playwright",
    # tooling
    "ruff",
    "mypy",
]

setup(
    name="guillotina_amqp",
    version="1.0.0.dev0",
    description="Run asyncio background tasks for Guillotina through RabbitMQ, with task state in Redis",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="BSD",
    classifiers=[
        "Framework :: AsyncIO",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Topic :: Software Development :: Libraries :: Python Modules",
    ],
    # enum.StrEnum, asyncio.timeout; guillotina_amqp.tests (fixtures, mocks) ships for applications
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]),
    include_package_data=True,
    package_data={"guillotina_amqp.dashboard": ["static/*"]},
    zip_safe=False,
    install_requires=[
        "guillotina>=7.1.5,<8",
        "aioamqp>=0.15,<0.16",
        "redis>=4.3",
        "hiredis",  # redis-py's C reply parser: a third of the worker's Redis cost without it
        "backoff",
        "lru-dict",
        "croniter>=2",  # periodic tasks' cron expressions (maintained, pallets-eco)
    ],
    extras_require={
        "test": test_requires,
        "metrics": ["prometheus-client"],
        # tracing: a publish span per add_task, a run span per task, linked through the message
        "otel": ["opentelemetry-api>=1.20", "opentelemetry-sdk>=1.20"],
    },
)
