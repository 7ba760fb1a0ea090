from guillotina import configure

configure.permission("guillotina.ManageAMQP", "Manage the AMQP tasks of a container")
configure.permission("guillotina.DebugAMQP", "See the messages (job_data) of AMQP tasks")
configure.grant(permission="guillotina.ManageAMQP", role="guillotina.Manager")
configure.grant(permission="guillotina.DebugAMQP", role="guillotina.Manager")
