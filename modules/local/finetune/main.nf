/*
 * FINETUNE: the models folder's Cellpose-SAM fine-tuned on the HSPCs labelled yes, from the
 * gathered tables, SEGMENT's masks (the batch folders) and the slides; writes a new models
 * folder (the other weights linked, a manifest with the parent and validation AP@0.5 before
 * and after). Runs after TRAIN when --finetune is set and labels are given.
 */
process FINETUNE {
    tag "${labels.size()} label files"
    label 'process_gpu'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    path cells
    path labels, arity: '1..*', stageAs: 'labels/*'
    path batch_dirs, arity: '1..*', stageAs: 'batches/*'
    tuple val(slide_ids), path(slides, arity: '1..*', stageAs: 'slides??/*')
    path models, stageAs: 'models'

    output:
    path 'finetuned_models', emit: models
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress finetune ${cells} ${labels} --batches ${batch_dirs} --slides ${slides} --slide-ids ${slide_ids} --models ${models} ${args} --out finetuned_models

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    mkdir -p finetuned_models
    touch finetuned_models/manifest.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
